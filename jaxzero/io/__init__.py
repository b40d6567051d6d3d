"""What goes to and from disk: a model's identity, HF safetensors, jaxzero model directories,
orbax checkpoints and the tokenizer. Nothing here trains."""
