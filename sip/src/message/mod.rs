//! SIP message model, parser and serializer (RFC 3261 section 7, 20, 25).
