//! Short chaos run: see loadtest `chaos`.
