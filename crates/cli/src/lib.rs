//! The trireme command-line client: noun-verb commands over the REST API
