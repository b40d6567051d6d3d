"""What a person watches: TensorBoard scalars and text, console lines, and PNG plots."""
