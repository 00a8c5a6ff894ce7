"""Local multi-node Ray clusters (`python -m cluster.local_cluster`) and deployment material for real ones."""
