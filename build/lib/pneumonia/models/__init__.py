"""Model definitions: `build` constructs the networks that pneumonia.architectures names."""
