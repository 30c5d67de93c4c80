"""moeyard.placement"""
