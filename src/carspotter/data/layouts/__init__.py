"""Layout readers: each turns one real Stanford Cars layout into a list of SourceItem."""
