"""Command line tools: `python3 -m tools.<name>` (export, test_pretrained, automix, toy_musdb,
bench)."""
