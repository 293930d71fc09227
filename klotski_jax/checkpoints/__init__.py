"""HF safetensors -> klotski-jax format (manifest + TensorStore); reading it back."""
