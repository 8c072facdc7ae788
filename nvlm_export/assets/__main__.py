"""`python -m nvlm_export.assets` regenerates the shipped example image."""

from nvlm_export.assets import write_example_image

print(write_example_image())
