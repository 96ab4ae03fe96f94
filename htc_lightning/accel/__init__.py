"""Optional speed-ups that change no numbers, each turned on explicitly (see each module)."""
