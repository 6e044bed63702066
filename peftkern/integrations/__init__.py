"""Model surgery and interop with other libraries."""
