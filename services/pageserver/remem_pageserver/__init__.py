"""remem page server: stores clients' 4 KiB pages in a RAM arena on a memory-donor host."""
