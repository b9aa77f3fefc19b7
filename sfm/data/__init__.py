"""Data: synthetic text and speech corpora with word timings (moshi-finetune layout)."""
