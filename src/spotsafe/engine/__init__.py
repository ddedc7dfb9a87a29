"""When and how checkpoints are taken: the Checkpointer and the persist step."""
