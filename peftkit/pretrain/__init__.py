"""Masked-LM pretraining from scratch: vanilla MLM and 3ML (Mask More and Mask Later, arXiv 2211.04898).

presets.py     RoBERTa configs by size (tiny/small/base/large)
corruption.py  which positions become prediction targets and how they are corrupted (80/10/10)
shorten.py     drop the [MASK] slots from a batch and put them back later, in order
decoder.py     the small self+cross-attention decoder of 3ML-cross
model.py       the pretraining model: vanilla MLM, 3ML-self, 3ML-cross around one RobertaForMaskedLM
cost.py        analytic FLOP counts of one step (for the equal-budget recipes and the bench cross-check)
corpus.py      text files -> token blocks; tokenizer.py: a local tokenizer or a byte-level BPE trained here
recipe.py      the pretraining recipe schema; command.py: `peftkit pretrain`; export.py: the final checkpoint
"""
