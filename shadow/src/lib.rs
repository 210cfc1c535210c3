//! Shadow page-table engine (filled in by the shadow-engine issue).
