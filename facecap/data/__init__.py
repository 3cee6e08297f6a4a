"""Editable data files (caption grammar, lexicons, keyword lists, prompts), versioned with the code."""
