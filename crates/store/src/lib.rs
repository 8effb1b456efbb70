//! The control plane's state store: a small transactional key-value trait with an embedded redb backend
