//! Test kit for end-to-end tests.
