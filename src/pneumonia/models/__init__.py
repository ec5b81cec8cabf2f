"""Model definitions: `registry` names them (no TensorFlow import), `build` constructs them."""
