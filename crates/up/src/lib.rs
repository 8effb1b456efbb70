//! trireme up: a whole local cluster (control plus N engines as supervised child processes) on one machine
