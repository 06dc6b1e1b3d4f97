"""Test helpers, one importable package (tests/ is on sys.path through conftest.py):

* ``helpers.tiny``         tiny models and tokenizers built from config (BERT, RoBERTa, LLaMA, GPT-2), GLUE files;
* ``helpers.quant``        a structured tiny LLaMA, calibration windows, WikiText-like files, quantizer options;
* ``helpers.pretrain``     a tiny RoBERTa config and corrupted batches for the 3ML tests;
* ``helpers.reliability``  recipes, set-ups and CLI runners for the bad-input and interruption tests.
"""
