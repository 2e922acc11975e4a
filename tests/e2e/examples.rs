//! The example workflows in `workflows/`.
