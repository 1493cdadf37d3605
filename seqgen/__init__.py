"""seqgen: sequence generation from any input with one RNN decoder and shared search."""
