"""Training, data, augmentation, synthesis, hard-negative mining and evaluation.

Kept apart from the inference side (as torchvision keeps ``references/`` outside its models):
the container, the CLI's ``mask`` command and the DAG workers never import this package.
"""
