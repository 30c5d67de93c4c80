"""moeyard.moe"""
