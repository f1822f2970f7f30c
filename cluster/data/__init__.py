"""Data sets: synthetic generation (synth), image/mask codecs (images), Parquet reading (reader)."""
