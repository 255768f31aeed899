"""The wire contract: manifest parsing, capability grammar, lifecycle table, claim protocol,
records and names. Pure: nothing in this package does I/O."""
