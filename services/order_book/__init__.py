"""order_book package."""
