"""The lean runtime: loads an engine bundle and generates video. Imports no model code."""
