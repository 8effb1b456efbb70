//! The storage engine: pools, replicas, the nexus, NBD shares, and the gRPC service control drives
