"""The paper's experiments as commands, composed from the library."""
