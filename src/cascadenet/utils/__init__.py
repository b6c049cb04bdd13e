"""The lowest layer: file writes that never tear, one-line errors, devices. Imports nothing of the package."""
