"""The real quantizers our references are compared with, byte for byte. Test and benchmark code only."""
