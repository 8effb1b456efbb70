//! The control plane: registry, reconcilers, scheduler, REST API with OpenAPI, engine registration
