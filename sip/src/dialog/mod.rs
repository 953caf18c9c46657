//! RFC 3261 section 12 dialogs, sans-IO, with export to and import from a versioned record.
