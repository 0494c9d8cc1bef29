"""Working with other tools: converting adapter folders to and from PEFT's format, and pushing them to the Hub."""
