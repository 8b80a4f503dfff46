"""The guest OS model: interrupt entry and EOI, IF/STI shadow, idle HLT, register writes."""
