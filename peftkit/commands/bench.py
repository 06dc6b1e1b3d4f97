"""`peftkit bench NAME`: settings from --set validated like a recipe section, the rows printed and saved."""

from __future__ import annotations


def run_bench(name: str, quick: bool, json_out: str | None, items: list[str]):
    import typer

    from peftkit.bench.harness import write_bench
    from peftkit.config.loader import load_settings
    from peftkit.utils.output_paths import check_output_file
    from peftkit.utils.registry import BENCHES

    if name == "list":
        for entry in BENCHES.entries():
            typer.echo(f"{entry.name:10s} {entry.help}")
        return None
    bench = BENCHES.get(name)
    settings = load_settings(bench.Settings, items, f"bench {name}")
    if json_out:  # a path that cannot take the result is refused before the work, not after it
        json_out = str(check_output_file(json_out, "--json"))
    rows = bench.run(quick, settings.given())
    return write_bench(name, rows, json_out)
