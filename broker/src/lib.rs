//! The embedded MQTT broker (filled in by the broker work).
