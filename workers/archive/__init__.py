"""The raw archive: the archiver, its Parquet format and cheap facts about it."""
