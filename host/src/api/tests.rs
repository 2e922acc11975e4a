//! The router without a socket (`tower::ServiceExt::oneshot`).
