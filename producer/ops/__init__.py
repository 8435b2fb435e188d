"""What an operator reads and repairs: queue and worker numbers (`stats`) and dead letters (`dead_letters`)."""
