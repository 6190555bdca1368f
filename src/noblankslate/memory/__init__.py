"""The No Blank Slate memory: the FAISS store of solved trajectories and the projections it owns."""
