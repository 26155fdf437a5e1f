"""Data: readers for every Stanford Cars layout → one prepared-dataset format (manifest.csv + images/)."""
