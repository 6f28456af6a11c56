"""Dataset adapters: each reads one on-disk layout into :class:`training.records.Record` s."""
