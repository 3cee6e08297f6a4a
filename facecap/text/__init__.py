"""Text: the caption grammar, the LLM client, faithfulness checks, and the FLIP-80M alt-text path."""
