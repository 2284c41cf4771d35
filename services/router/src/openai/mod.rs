//! OpenAI's chat API on the router: the JSON types ([`types`]) and their conversion to and from
//! the router's messages ([`convert`]), shared by the HTTP edge and batch input.
pub mod convert;
pub mod types;
