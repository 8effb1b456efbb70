//! The REST API's resources, request bodies, problem documents, and a typed client
