"""moeyard.cluster"""
