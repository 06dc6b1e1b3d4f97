"""`peftkit eval` reaches every suite through the task that declares it: the command names no suite."""

import re
from pathlib import Path

from peftkit.commands.evaluate import eval_task
from peftkit.utils.registry import TASKS

COMMAND = Path(__file__).resolve().parents[2] / "peftkit" / "commands" / "evaluate.py"


def test_each_suite_word_picks_the_task_that_declares_it():
    suites = {}
    for entry in TASKS.entries():
        if entry.target.eval_suite:
            suites.setdefault(entry.target.eval_suite, set()).add(entry.target)
    assert all(len(classes) == 1 for classes in suites.values()), suites  # one task per suite word
    assert {"glue", "wikitext2"} <= set(suites)
    for suite, (cls,) in suites.items():
        assert eval_task(suite) is cls
    assert eval_task("reviews.csv").name == "dataset" and eval_task("imdb").name == "dataset"  # rows of one's own


def test_the_command_names_no_suite():
    code = COMMAND.read_text(encoding="utf-8")
    assert not re.search(r"[\"'](glue|wikitext2|sst2)[\"':]", code), "a suite is named in commands/evaluate.py"
