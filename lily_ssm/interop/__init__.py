"""Interoperability with other tools' formats: PEFT adapter folders and the Hugging Face Hub."""
