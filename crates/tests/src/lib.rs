//! Integration tests: real processes, real NBD clients, real faults
